"""`--config configs/synthetic.py`: configs/magnet.py with ARG synthetic (see there)."""

from configs import magnet


def get_config(arg: str = "synthetic"):
    return magnet.get_config(arg)
