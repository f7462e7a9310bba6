"""A Python runtime: the process a node starts (the driver's interpreter, ``-m yr._runtime``)
to serve one instance or a pool of stateless calls. It never returns: the node tells it when
to exit."""

from yr import _dispatch, _yr


def main():
    _dispatch.IN_RUNTIME = True
    _yr.serve()


if __name__ == "__main__":
    main()
