"""The build's one step that pyproject.toml cannot declare: the wheel holds copies of the top-level folders
configs/ and experiments/ as package data, priorlab/configs and priorlab/experiments (priorlab.resources finds
them there). They stay at the top level of the repository, where a checkout and an editable install read them."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("configs", "experiments")  # priorlab.resources.SHIPPED


class BuildWithShippedFolders(build_py):
    """build_py, then each shipped folder copied whole into the built package (an old copy replaced, so a file
    deleted from the repository leaves the wheel too). An editable build copies nothing: it reads them in place."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for name in SHIPPED:
            target = Path(self.build_lib, "priorlab", name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(name, target, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))


setup(cmdclass={"build_py": BuildWithShippedFolders})
