// A JVM app for the e2e matrix, run with default flags as `java /apps/Counter.java` (single-file
// source launch). Worker threads count independently, the heap grows by 1 MiB per tick (up to
// 128 MiB, then entries are replaced), and every tick prints one line in the counter format the
// harness parses: "<n> heap=ok|bad work=<sum of the workers' counts> threads=<alive> mib=<heap>".
// heap=ok means every heap block still holds the pattern it was filled with.
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.atomic.AtomicLong;

public class Counter {
    static final int THREADS = 4;
    static final int MAX_BLOCKS = 128;

    public static void main(String[] args) throws Exception {
        AtomicLong[] counts = new AtomicLong[THREADS];
        List<Thread> workers = new ArrayList<>();
        for (int i = 0; i < THREADS; i++) {
            AtomicLong c = counts[i] = new AtomicLong();
            Thread t = new Thread(() -> {
                while (true) {
                    c.incrementAndGet();
                    try { Thread.sleep(10); } catch (InterruptedException e) { return; }
                }
            }, "worker-" + i);
            t.setDaemon(true);
            t.start();
            workers.add(t);
        }
        List<byte[]> heap = new ArrayList<>();
        int[] pattern = new int[MAX_BLOCKS];
        System.out.println("start pid=" + ProcessHandle.current().pid() + " java=" + System.getProperty("java.version"));
        System.out.flush();
        for (long n = 0; ; n++) {
            int slot = (int) (n % MAX_BLOCKS);
            byte[] b = new byte[1 << 20];
            Arrays.fill(b, (byte) (n % 251));
            if (heap.size() < MAX_BLOCKS) heap.add(b); else heap.set(slot, b);
            pattern[slot] = (int) (n % 251);
            boolean ok = true;
            for (int k = 0; k < heap.size(); k++) {
                byte[] x = heap.get(k);
                ok &= x[0] == (byte) pattern[k] && x[x.length - 1] == (byte) pattern[k] && x[x.length / 2] == (byte) pattern[k];
            }
            long work = 0;
            for (AtomicLong c : counts) work += c.get();
            long alive = workers.stream().filter(Thread::isAlive).count();
            System.out.println(n + " heap=" + (ok ? "ok" : "bad") + " work=" + work + " threads=" + alive + " mib=" + heap.size());
            System.out.flush();
            Thread.sleep(500);
        }
    }
}
