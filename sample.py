"""Sample from a trained run: python sample.py --workdir runs/quickstart --num-samples 4 --steps 128 [--prompt "def "]"""

from dlm.cli import sample_main

if __name__ == "__main__":
    sample_main()
