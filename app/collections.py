"""A collection opened for serving queries, shared by the Streamlit app and ``clipdex serve`` (no Streamlit
here): its :class:`SearchCollection` with the FAISS indexes loaded, the rows they hold, each image's captions,
and the only folders its files may be opened under. The app caches one per table version
(:mod:`clipdex.app.backend`); the server keeps one per collection and reopens it when its tables change
(:mod:`clipdex.server.state`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clipdex.app.inputs import InputError, decode_checked, read_confined, resolved_roots
from clipdex.app.jobs import listing_sidecar
from clipdex.retrieval.store.record import Database
from clipdex.retrieval.store.search import SearchCollection


@dataclass
class LoadedCollection:
    """A collection ready for queries, with the rows its FAISS indexes hold (no LanceDB call per query)."""

    name: str
    search: SearchCollection
    ids: list[str]  # image ids in FAISS order
    paths: list[str]
    position: dict[str, int]  # image id -> index into ids/paths
    captions: dict[str, list[str]]  # image id -> its captions
    roots: tuple[Path, ...]  # the only folders its files are opened under (resolved)

    def path_of(self, image_id: str) -> str:
        """The file of a row of this collection; any other id is refused (paths never come from requests)."""
        if image_id not in self.position:
            raise InputError(f"no image {image_id!r} in collection {self.name!r}")
        return self.paths[self.position[image_id]]

    def image(self, image_id: str, *, max_pixels: int):
        """The image of a row, opened only under the collection's roots and decoded with an upload's checks."""
        path = self.path_of(image_id)
        return decode_checked(read_confined(path, roots=self.roots), label=path, max_pixels=max_pixels)


def load_collection(db: str | Path, name: str, *, encoder, index_roots: tuple[str, ...] = ()) -> LoadedCollection:
    """Open ``name`` of database ``db`` for search with ``encoder`` (refused if the collection was indexed with
    another model), load its FAISS indexes and rows; its files may be opened under ``index_roots`` and the
    folders it was indexed from."""
    col = Database(db).open(name)
    search = SearchCollection(col, encoder=encoder)  # refuses another model
    images, captions = search.index("images").columns, search.index("captions").columns
    by_image: dict[str, list[str]] = {}
    for owner, text in zip(captions["image_id"], captions["text"]):
        by_image.setdefault(owner, []).append(text)
    roots = resolved_roots([*index_roots, *(source_folder(s) for s in col.sources())])
    return LoadedCollection(name, search, images["id"], images["path"],
                            {i: n for n, i in enumerate(images["id"])}, by_image, roots)


def source_folder(source: str) -> str:
    """The folder a collection source covers: a folder itself, an app listing's folder, a manifest's folder."""
    sidecar = listing_sidecar(source)
    if sidecar is not None:
        return sidecar["folder"]
    path = Path(source.partition("#split=")[0])
    return str(path if path.is_dir() else path.parent)
