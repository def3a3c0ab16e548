"""Foundation, lowest layer: the model wrapper and its vocabulary.

``hooks`` (TransformerLens hook names, the only place they are built), ``components`` (what a
unit is: layer, kind, index), ``model`` (``HookedModel``), ``generation``, ``weights`` (the only
place Hugging Face module internals are touched) and ``progress``.
"""
