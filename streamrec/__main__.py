from streamrec.cli.main import main

main()
