from shelltrain.cli import main

main()
