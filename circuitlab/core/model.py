"""HookedModel: a TransformerLens ``TransformerBridge`` plus what refusal experiments need.

Loading (embedded / tiny / Hugging Face id / local directory), chat formatting, left-padded
length-sorted batching, position-selective activation caching, temporary hooks, last-position
logits that unembed only what is read, and greedy KV-cached generation.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from circuitlab.core import hooks as hk
from circuitlab.core.generation import common_prefix_length, generate, run_prefix
from circuitlab.core.progress import progress_bar

__all__ = ["HookedModel", "Positions", "resolve_positions"]

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


@dataclass(frozen=True)
class Positions:
    """Which token positions to read. ``offsets`` are negative (left padding right-aligns prompts).

    ``spec`` is the canonical string used in cache keys: ``last``, ``post``, ``mean`` or ``-3,-1``.
    """

    spec: str
    offsets: tuple[int, ...] | None  # None means: mean over all real tokens

    @property
    def is_mean(self) -> bool:
        return self.offsets is None

    def __len__(self) -> int:
        return 1 if self.offsets is None else len(self.offsets)


def resolve_positions(spec, n_post: int) -> Positions:
    """Turn ``"last"``, ``"post"``, ``"mean"``, an int or a list of negative ints into Positions.

    ``post`` = the chat-template tokens after the user's text (``n_post`` of them), as in
    Arditi et al. 2024's post-instruction positions.
    """
    if isinstance(spec, Positions):
        return spec
    if spec == "last":
        return Positions("last", (-1,))
    if spec == "mean":
        return Positions("mean", None)
    if spec == "post":
        if n_post < 1:
            raise ValueError("positions='post' needs chat formatting (the template tokens after the prompt)")
        return Positions("post", tuple(range(-n_post, 0)))
    if isinstance(spec, int) and not isinstance(spec, bool):
        spec = [spec]
    if isinstance(spec, (list, tuple)) and spec and all(isinstance(p, int) and p < 0 for p in spec):
        offsets = tuple(sorted(set(spec)))
        return Positions(",".join(map(str, offsets)), offsets)
    raise ValueError(
        f"positions={spec!r} is not understood. Use 'last', 'post', 'mean', or negative offsets "
        "from the end of the prompt such as [-3, -2, -1]."
    )


class HookedModel:
    """A TransformerBridge with chat formatting, batching, caching and intervention helpers."""

    def __init__(self, bridge, tokenizer, name: str):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        cfg = bridge.cfg
        self.n_layers: int = cfg.n_layers
        self.d_model: int = cfg.d_model
        self.d_mlp: int = cfg.d_mlp
        self.n_heads: int = cfg.n_heads
        self.d_head: int = cfg.d_head
        self._hook_names = frozenset(bridge.hook_dict.keys())
        self._fingerprint_cache: tuple | None = None
        self.n_post = self._count_post_instruction_tokens()

    @classmethod
    def from_bridge(cls, bridge, tokenizer, *, name: str | None = None) -> "HookedModel":
        """Wrap an existing TransformerBridge: parameters frozen, eval mode (the documented way in)."""
        bridge.eval()
        for p in bridge.parameters():
            p.requires_grad_(False)
        return cls(bridge, tokenizer, name or getattr(bridge.cfg, "model_name", None) or "custom")

    # ---- identity -------------------------------------------------------------------------

    @property
    def hf_model(self) -> torch.nn.Module:
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (layers may sit on other devices)."""
        return _module_device(self.hf_model.get_input_embeddings(), self.bridge.cfg)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """sha256 over every weight's name, shape, dtype and bytes; recomputed after any edit."""
        params = list(self.hf_model.state_dict().items())
        # In-place edits bump a tensor's _version; replaced tensors change data_ptr.
        state = tuple((n, p.data_ptr(), p._version) for n, p in params)
        if self._fingerprint_cache is None or self._fingerprint_cache[0] != state:
            digest = hashlib.sha256()
            for n, p in params:
                digest.update(f"{n}:{tuple(p.shape)}:{p.dtype};".encode())
                digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            self._fingerprint_cache = (state, digest.hexdigest()[:32])
        return self._fingerprint_cache[1]

    def __repr__(self) -> str:
        return (f"HookedModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, "
                f"n_heads={self.n_heads}, d_mlp={self.d_mlp})")

    # ---- text -----------------------------------------------------------------------------

    def format(self, prompt: str, chat: bool = True, prefill: str | None = None) -> str:
        """The prompt as the model sees it: in the chat template (default) or raw. ``prefill``: text the
        assistant turn starts with (a prefill attack's opener), appended after the generation prompt."""
        if not chat:
            if prefill:
                raise ValueError("prefill needs a chat prompt (chat=True): it starts the assistant turn")
            return prompt
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return text + (prefill or "")

    def _count_post_instruction_tokens(self) -> int:
        """Template tokens after the user's text (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
        if not getattr(self.tokenizer, "chat_template", None):
            return 0
        marker = "zq"
        text = self.format(marker)
        suffix = text[text.rindex(marker) + len(marker):]
        return len(self.tokenizer(suffix, add_special_tokens=False).input_ids)

    def tokenize(self, prompts: Sequence[str], chat: bool = True,
                 prefill: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ``(input_ids, attention_mask)`` for ``prompts`` (``prefill``: see ``format``)."""
        texts = [self.format(p, chat, prefill) for p in prompts]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc.input_ids.to(self.device), enc.attention_mask.to(self.device)

    def token_lengths(self, prompts: Sequence[str], chat: bool = True, prefill: str | None = None) -> list[int]:
        texts = [self.format(p, chat, prefill) for p in prompts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False).input_ids]

    def batches(self, prompts: Sequence[str], batch_size: int = 16, chat: bool = True, prefill: str | None = None
                ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """Yield ``(indices, input_ids, attention_mask)``; prompts sorted by length to cut padding."""
        lengths = self.token_lengths(prompts, chat, prefill)
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            ids, mask = self.tokenize([prompts[i] for i in idx], chat, prefill)
            yield idx, ids, mask

    def to_single_token(self, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer, not one")
        return ids[0]

    # ---- hooks ----------------------------------------------------------------------------

    def check_hooks(self, names) -> list[str]:
        """Validate hook names against this model (nearest names in the error)."""
        return hk.validate(names, self._hook_names, self.n_layers)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[str, HookFn]] = (), bwd_hooks: Iterable[tuple[str, HookFn]] = ()):
        """Temporarily add hooks; they are removed on exit, whatever happens inside."""
        fwd_hooks, bwd_hooks = list(fwd_hooks), list(bwd_hooks)
        self.check_hooks([n for n, _ in fwd_hooks + bwd_hooks])
        with self.bridge.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            yield self

    # ---- forward passes -------------------------------------------------------------------

    def forward(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return self.bridge(input_ids, attention_mask=attention_mask, **kwargs)

    def final_logits(self, resid: torch.Tensor) -> torch.Tensor:
        """Apply the final norm and unembedding to residual vectors ``[..., d_model]``."""
        # With a device map the final norm may sit on another device; stored activations may be float32.
        resid = resid.to(device=_module_device(self.bridge.ln_final, self.bridge.cfg), dtype=self.dtype)
        return self.bridge.unembed(self.bridge.ln_final(resid))

    def last_logits(self, prompts: Sequence[str], *, chat: bool = True, batch_size: int = 16,
                    fwd_hooks: Iterable[tuple[str, HookFn]] = (), progress: bool = False,
                    desc: str = "logits", prefill: str | None = None) -> torch.Tensor:
        """Next-token logits at the last prompt position, ``[n_prompts, vocab]`` (float32).
        ``prefill``: the assistant turn starts with this text (``format``); logits follow it.

        Only the last position is unembedded: the unembedding is a large share of the FLOPs.
        """
        out = torch.empty(len(prompts), self.bridge.cfg.d_vocab)
        with torch.no_grad(), self.hooks(fwd_hooks):
            for idx, ids, mask in progress_bar(self.batches(prompts, batch_size, chat, prefill), progress,
                                               total=-(-len(prompts) // batch_size), desc=desc):
                resid = self.final_residual(ids, mask)
                out[idx] = self.final_logits(resid[:, -1]).float().cpu()
        return out

    def final_residual(self, input_ids, attention_mask=None, on_final=None) -> torch.Tensor:
        """Residual stream after the last block ``[batch, seq, d_model]``; skips the unembedding.

        ``on_final(resid)`` may replace it (a hook on the logits' input); gradients flow through.
        """
        captured = {}

        def grab(act, hook):
            captured["resid"] = on_final(act) if on_final is not None else act
            raise _StopForward

        with self.bridge.hooks(fwd_hooks=[(hk.final_resid(), grab)]):
            try:
                self.forward(input_ids, attention_mask)
            except _StopForward:
                pass
        if "resid" not in captured:
            raise RuntimeError(f"the forward pass never reached the final residual ({hk.final_resid()})")
        return captured["resid"]

    def run_with_cache(self, prompts: Sequence[str], names, positions="last", *, chat: bool = True,
                       batch_size: int = 16, progress: bool = False, desc: str = "activations",
                       fwd_hooks: Iterable[tuple[str, HookFn]] = (),
                       share_prefix: bool = True) -> dict[str, torch.Tensor]:
        """Activations at ``names`` for ``prompts``, only at the requested positions.

        Returns ``{name: tensor}`` with prompts in input order, shape ``[n_prompts, n_positions, ...]``
        (``[n_prompts, ...]`` for ``positions='mean'``). Runs only the layers the names need. With
        ``share_prefix``, for end-relative positions without ``fwd_hooks``, the tokens a batch shares
        (the chat template's system turn) run once and every prompt's rest on their keys/values
        (``generation.run_prefix``): the same activations up to float rounding, for a fraction of the
        tokens; ``share_prefix=False`` runs every row whole (bit-for-bit comparisons with hooked runs).
        """
        names = self.check_hooks(names)
        pos = resolve_positions(positions, self.n_post if chat else 0)
        if any(n.endswith("hook_pattern") or n.endswith("hook_attn_scores") for n in names):
            raise ValueError("attention patterns have a ragged key dimension; read them with model.hooks()")
        fwd_hooks = list(fwd_hooks)
        layers = [hk.layer_of(n) for n in names]
        stop = None if any(l is None for l in layers) or max(layers) + 1 >= self.n_layers else max(layers) + 1
        results: dict[str, list] = {n: [None] * len(prompts) for n in names}
        current: dict = {}

        def make_saver(name):
            def save(act, hook):
                if current["mask"] is not None:  # None while a shared prefix runs: its positions are not asked for
                    current[name] = _select_positions(act, pos, current["mask"])
            return save

        total = -(-len(prompts) // batch_size)
        with torch.no_grad(), self.hooks(fwd_hooks + [(n, make_saver(n)) for n in names]):
            for idx, ids, mask in progress_bar(self.batches(prompts, batch_size, chat), progress,
                                               total=total, desc=desc):
                shared = share_prefix and not (pos.is_mean or fwd_hooks)
                p = common_prefix_length(ids, mask, keep=-min(pos.offsets)) if shared else 0
                if p:
                    current["mask"] = None
                    rest, current["mask"], mask, cache = run_prefix(self.bridge, ids, mask, p, stop_at_layer=stop)
                    self.forward(rest, mask, past_key_values=cache, stop_at_layer=stop)
                else:
                    current["mask"] = mask
                    self.forward(ids, mask, stop_at_layer=stop)
                for n in names:
                    for row, i in enumerate(idx):
                        results[n][i] = current[n][row]
        return {n: torch.stack(v) for n, v in results.items()}

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 24, **kwargs) -> list[str]:
        """Greedy completions with hooks active at every step (see ``circuitlab.core.generation.generate``)."""
        return generate(self, prompts, max_new_tokens, **kwargs)


def _module_device(module: torch.nn.Module, cfg=None) -> torch.device:
    """The device of a module's first real (non-meta) parameter; else the bridge's ``cfg.device``."""
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device(getattr(cfg, "device", None) or "cpu")


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once what is needed has been read."""


def _select_positions(act: torch.Tensor, pos: Positions, mask: torch.Tensor) -> torch.Tensor:
    """Pick positions from ``[batch, seq, ...]`` activations (float32, on CPU)."""
    if pos.is_mean:
        m = mask.to(device=act.device, dtype=act.dtype).view(*mask.shape, *([1] * (act.dim() - 2)))
        return ((act * m).sum(1) / m.sum(1)).float().cpu()
    return act[:, list(pos.offsets)].float().cpu()
