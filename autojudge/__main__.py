from autojudge.cli import main

main()
