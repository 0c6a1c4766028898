"""The Streamlit front end (``clipdex app``): Search, Ask and Collection pages over the library's Python API.

``main.py`` is the entry script and ``pages/`` the pages; ``backend`` loads the encoder and collections once
per process, ``widgets`` holds what the pages share, ``inputs`` checks everything a request brings, ``jobs``
runs "index a folder" in the background, ``settings`` and ``cli`` start it all.
"""
