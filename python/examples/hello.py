"""openYuanrong's quickstart, unchanged: a stateless function invoked three times, and three
instances that each save 9. Run it with `scripts/run-example hello.py`: with no cluster on this
machine, yr.init starts a temporary one that exits with the program."""

import yr


@yr.invoke
def say_hello(name):
    return "hello, " + name


@yr.instance
class Object:
    def __init__(self):
        self.value = 0

    def save(self, value):
        self.value = value

    def get(self):
        return self.value


def main():
    yr.init()

    results_ref = [say_hello.invoke("yuanrong") for _ in range(3)]
    print(yr.get(results_ref))

    objects = [Object.invoke() for _ in range(3)]
    for instance in objects:
        instance.save.invoke(9)
    print(yr.get([instance.get.invoke() for instance in objects]))
    for instance in objects:
        instance.terminate()

    yr.finalize()


if __name__ == "__main__":
    main()
