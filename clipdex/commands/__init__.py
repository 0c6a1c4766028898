"""The ``clipdex`` subcommands: each module adds its commands to the parser and prints their results.

These are the only modules that parse arguments or print; the library (``retrieval``, ``indexer``,
``data_manifests``, ``app``) returns values and raises, and never imports from here. ``argtypes`` holds what
the commands share: the parser classes and help formatter (one help style), argparse value types, help texts.
"""
