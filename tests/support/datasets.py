"""Build real, frozen dtool datasets on local disk."""

import hashlib

import dtoolcore
import dtoolcore.utils


def make_local_dataset(base_dir, name, items):
    """Create and freeze dataset ``name`` in ``base_dir``; return its file:// URI.

    ``items`` maps relpath -> content bytes.
    """
    base_uri = dtoolcore.utils.sanitise_uri(str(base_dir))
    with dtoolcore.DataSetCreator(name, base_uri) as creator:
        for relpath, content in items.items():
            fpath = creator.prepare_staging_abspath_promise(relpath)
            with open(fpath, "wb") as fh:
                fh.write(content)
        uri = creator.uri
    return uri


def item_identifier(relpath):
    """Return the dtool item identifier (sha1 of the relpath)."""
    return dtoolcore.utils.generate_identifier(relpath)


def md5_hex(content):
    """Return the md5 hex digest dtool records in the manifest's ``hash``."""
    return hashlib.md5(content).hexdigest()


def file_md5_hex(path):
    """Return the md5 hex digest of the file at ``path``."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

