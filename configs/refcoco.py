"""`--config configs/refcoco.py`: configs/magnet.py with ARG refcoco (see there)."""

from configs import magnet


def get_config(arg: str = "refcoco"):
    return magnet.get_config(arg)
