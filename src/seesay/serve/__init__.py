"""`seesay serve`: captions over HTTP (an application of the library; the library never imports it).

    app.py       the Starlette app: endpoints, limits, errors (`create_app`, `Settings`, `model_info`)
    batcher.py   requests that arrive close together decoded as one batch on one worker thread
    options.py   a request's decoding options: `seesay caption`'s names, types and limits
    page.html    the one self-contained page served at /

Needs the `serve` extra (starlette, uvicorn, python-multipart); see docs/serve.md.
"""
