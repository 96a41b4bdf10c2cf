from cy_sidecar.cli import main

main()
