"""The Streamlit front end (``clipdex app``): Search, Ask and Collection pages over the library's Python API.

``main.py`` is the entry script and ``views/`` the pages; ``auth`` is the sign-in, ``backend`` loads the encoder
and collections once per process, ``turns`` makes model calls take turns across sessions, ``widgets`` holds
what the pages share, ``inputs`` checks everything a request brings and every file opened, ``jobs`` runs
"index a folder" in the background, ``settings`` and ``clipdex app`` start it all.
"""
