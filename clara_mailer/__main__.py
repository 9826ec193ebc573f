from clara_mailer.cli import main

if __name__ == "__main__":  # guarded: `send --processes` starts spawned processes that import this
    main()
