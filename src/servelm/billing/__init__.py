"""Money: accounts and keys, credit holds and settlement, the ledger and its audit."""
