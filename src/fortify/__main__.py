from fortify.launch import main

main()
