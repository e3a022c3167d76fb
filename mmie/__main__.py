from mmie.cli import main

main()
