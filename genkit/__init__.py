"""genkit: command-line text generation on Hugging Face transformers, with its own decode engine.

The Python API (imported lazily, so `import genkit` stays cheap):

    import genkit
    lm = genkit.load()                                   # the embedded default model
    print(genkit.generate(lm, "Hello!", preset="creative", seed=1).text)
    for event in genkit.stream(lm, "Tell me a story", max_new_tokens=50):
        print(event.text, end="", flush=True)
"""

__version__ = "0.1.0"

_API = {"load", "generate", "stream", "settings_for", "Result"}


def __getattr__(name):
    if name in _API:
        from genkit import api

        return getattr(api, name)
    raise AttributeError(name)
