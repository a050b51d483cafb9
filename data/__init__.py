"""The results the book shows, shipped inside the wheel as package data of ``kascade_lite.shipped`` (this folder;
see ``[tool.setuptools.package-dir]`` in pyproject.toml). Read them with `kascade_lite.files.results_file` /
`kascade_lite.files.load_results`, never by a path into the repository."""
