"""`--config configs/refcocog_umd.py`: configs/magnet.py with ARG refcocog_umd (see there)."""

from configs import magnet


def get_config(arg: str = "refcocog_umd"):
    return magnet.get_config(arg)
