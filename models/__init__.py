"""Model directories shipped with the package: ``default/`` is the model the platform serves
by default (trained by ``vsearch train``; see its README)."""
