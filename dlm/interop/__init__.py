"""Published checkpoints: import (HF safetensors folders -> dlm models on a mesh) and export."""
