"""Iterating on a background thread, a few items ahead, so that the consumer (the train step) does not wait for the
producer (reading and densifying minibatches) when the two can overlap."""

import queue
import threading

_END = object()


class _Failed:
  def __init__(self, error: BaseException):
    self.error = error


def prefetch(iterable, depth: int = 2):
  """The items of `iterable`, produced on a daemon thread up to `depth` ahead; its exceptions are raised here."""
  items = queue.Queue(maxsize=depth)

  def produce():
    try:
      for item in iterable:
        items.put(item)
    except BaseException as e:  # Handed to the consumer, which raises it.
      items.put(_Failed(e))
      return
    items.put(_END)

  threading.Thread(target=produce, daemon=True, name="clue_jax-prefetch").start()
  while (item := items.get()) is not _END:
    if isinstance(item, _Failed):
      raise item.error
    yield item
