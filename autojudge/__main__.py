from autojudge.commands import main

main()
