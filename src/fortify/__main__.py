from fortify.cli import main

main()
