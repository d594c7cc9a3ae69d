from dpo_dist.cli import console

if __name__ == "__main__":
    console()
