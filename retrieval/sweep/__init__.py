"""`retrieval sweep`: a table of experiments planned (shared extractions), run and compared."""
