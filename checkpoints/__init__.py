"""The checkpoint zoo (`zoo.toml`: names -> sources) and the default place checkpoints land."""

from pathlib import Path

ZOO_FILE = Path(__file__).with_name("zoo.toml")
CONFIG_DIR = Path(__file__).with_name("configs")
