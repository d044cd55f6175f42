from shelltrain.start import main

main()
