"""Foundation: where models come from. ``loading.load_model`` dispatches on a name: ``embedded``
(the shipped GGUF chat model), ``tiny`` (built locally for tests), ``planted`` (known circuits), a
Hugging Face id or a local directory."""
