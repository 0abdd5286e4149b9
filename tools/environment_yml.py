"""Write environment.yml, the conda form of requirements.txt (run by `make lock`)."""

from pathlib import Path

HEADER = [
    "# Conda form of requirements.txt (same pins; tests/test_packaging.py keeps them equal).",
    "# conda env create -f environment.yml && conda activate repic",
    "name: repic", "channels:", "  - conda-forge", "dependencies:", "  - python=3.11", "  - pip", "  - pip:",
]


def main() -> None:
    pins = [ln for ln in Path("requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    Path("environment.yml").write_text("\n".join(HEADER + [f"      - {p}" for p in pins]) + "\n")


if __name__ == "__main__":
    main()
