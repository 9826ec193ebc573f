from .cli import main

if __name__ == "__main__":  # guarded: `send --workers` starts processes that import this
    main()
