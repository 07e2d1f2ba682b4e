"""Model directories shipped with the package: ``default/`` is the model the platform serves
by default (trained by ``vsearch train``; see its README)."""

# This folder is the package vsearch.models (the checkout's models/ links here). Imported under any other
# name (`import models` from the checkout's root) it would be a second copy whose classes differ.
if __name__ != "vsearch.models":
    raise ImportError(f"import vsearch.models, not {__name__}: models/ is a link to the package vsearch.models")
