# Guarded: multiprocessing's spawn imports the main module again in every worker process.
if __name__ == "__main__":
    from stoker.supervisor.cli import main

    main()
