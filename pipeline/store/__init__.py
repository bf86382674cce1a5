"""OUTPUT's storage: the Delta tables (`tables`), a run's commit over them and what readers may see
(`commit`), video claims between overlapping runs (`claims`), upkeep (`maintain`).

Everything that touches OUTPUT's tables goes through `TableStore`, which turns delta-rs's and the
store's failures into `OutputError` at this boundary.
"""

from pipeline.store.location import OutputError
from pipeline.store.tables import TableStore

__all__ = ["OutputError", "TableStore"]
