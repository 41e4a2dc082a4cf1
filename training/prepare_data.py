"""`python -m training.prepare_data SOURCE ...`: the dataset converter's command line (see `training/data/convert.py`).

    python -m training.prepare_data isic2024 --metadata train-metadata.csv --images train-image.hdf5 --output-dir data/isic2024
    python -m training.prepare_data synthetic --patients 300 --seed 0 --output-dir data/synthetic
    python -m training.prepare_data --help
"""

from training.data.convert import cli, main

__all__ = ["main"]

if __name__ == "__main__":
    cli()
