"""`genkit serve`: an OpenAI-compatible HTTP server on genkit's engine.

    schema.py     OpenAI request bodies -> genkit parameters; OpenAI's error shape
    service.py    requests -> engine work (presets, prompts, tokens); events -> response shapes
    scheduler.py  the engine thread: one continuous batch shared by every request
    app.py        FastAPI routes, bearer tokens, server-sent events, uvicorn

Imported only by `genkit serve`, so that other commands never load FastAPI or uvicorn.
"""
