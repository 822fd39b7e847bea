"""One module per stage of the workflow, named after its rule; each imports only the library
(the modules of vldd above this folder), and only vldd.cli imports them."""
