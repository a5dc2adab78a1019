"""`--config configs/refcocog_google.py`: configs/magnet.py with ARG refcocog_google (see there)."""

from configs import magnet


def get_config(arg: str = "refcocog_google"):
    return magnet.get_config(arg)
