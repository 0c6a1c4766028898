"""Dataset schemas and manifests: the built-in captioned world and users' own manifests."""
