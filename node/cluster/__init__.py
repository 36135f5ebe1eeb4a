"""Several nodes on one queue: membership, the nodes view, wakes and the shared storage check.

A deployment is any number of ``vaenode serve`` receivers and ``vaenode worker`` scorers on one
PostgreSQL database and one shared storage folder (docs/cluster.md). Everything that must
happen once across them rests on PostgreSQL itself: row locks for the series and outbox rows,
and session advisory locks for a node's name and for the cluster-wide jobs. With SQLite the
node is alone, and this package only keeps it that way.
"""
