"""`pixelrefer serve`: a local web app over an index (search, play, inspect objects).

`command` (the CLI), `app` (routes, security headers, JSON errors), `api` (what is read from the
index), `media` (range requests over fsspec), `static/` (the pages: HTML, CSS, JS modules, no build
step and nothing from the internet).
"""
