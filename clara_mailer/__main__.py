from clara_mailer.cli import run

if __name__ == "__main__":  # guarded: `send --processes` starts spawned processes that import this
    run()
