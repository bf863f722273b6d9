"""python -m dlm.serve --workdir W | --pretrained DIR: the OpenAI-compatible server (dlm.serve.server)."""

from dlm.serve.server import main

main()
