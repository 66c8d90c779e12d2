"""The operator console (`tracker web`): server-rendered pages over the store, behind a token.

app.py wires the aiohttp application and its middlewares; auth.py and csrf.py guard it;
pages.py answers; queries.py reads what the pages show; serve.py runs it in the foreground.
"""
