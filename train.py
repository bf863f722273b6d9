"""Train a discrete diffusion LM: python train.py --config configs/quickstart.yaml [key=value ...]"""

from dlm.cli import train_main

if __name__ == "__main__":
    train_main()
