"""georeg as an OCI image, built without a container daemon (``make image``).

Three stages, each a directory shaped like a root filesystem, each one layer:

* ``base``: Debian bookworm's Python and the C libraries the wheels link
  against, unpacked by mmdebstrap (no dpkg, shell or apt in the image), minus
  docs, man pages, locales, apt lists and byte code; ``/etc/passwd`` with the
  unprivileged ``georeg`` user and its ``/data`` volume;
* ``deps``: georeg's runtime requirements as wheels for CPython 3.11 on
  manylinux, the ones installed in the environment that builds (the versions
  the tests ran against), copied from it, or fetched by pip when that
  environment is not CPython 3.11 with bookworm-compatible wheels, under
  ``/opt/georeg/deps``, with byte code;
* ``app``: georeg itself, a wheel built from the checkout, under
  ``/opt/georeg/app``, with byte code, and the ``/usr/local/bin/georeg`` launcher.

``base`` and ``deps`` are cached under a directory named after a hash of what
makes them (``rootfs.py``); ``app`` is rebuilt every time. ``layout.py`` packs
the stages into an OCI image layout that is byte-for-byte the same for the
same stages and the same ``SOURCE_DATE_EPOCH``.
"""
