"""The dispatch side, ``relay run``: claim due effects, publish them in Kafka transactions, record
each attempt's outcome, and check every ambiguous publish in Kafka before anything is sent again."""
