from dlm.eval.command import main

main()
