package edu.cmu.meteor.aligner;

import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;

/**
 * Drop-in replacement for meteor-1.5.jar's SynonymMatcher, put before the jar on the class path by
 * deepmedix.eval.nlg. Same matches in the same order: a hypothesis word i and a reference word j
 * match (module, prob 1.0) when their synset sets (the word's and its morphological bases') intersect and their
 * stage keys differ; matches are added per reference position j in ascending i. The jar's version keeps the
 * per-word sets in Hashtable<Integer, HashSet> and looks both up for every word pair; here they are sorted int
 * arrays, remembered per word (the dictionary does not change while the jar runs), and pairs where either side
 * has no synset are skipped.
 */
public class SynonymMatcher {

    private static SynonymDictionary cachedFor = null;
    private static final HashMap<String, int[]> cache = new HashMap<String, int[]>();

    private static synchronized int[] synsets(SynonymDictionary dict, String word) {
        if (dict != cachedFor || cache.size() > 1000000) {
            cache.clear();
            cachedFor = dict;
        }
        int[] out = cache.get(word);
        if (out == null) {
            out = lookup(dict, word);
            cache.put(word, out);
        }
        return out;
    }

    private static int[] lookup(SynonymDictionary dict, String word) {
        HashSet<Integer> set = new HashSet<Integer>(dict.getSynSets(word));
        set.addAll(dict.getStemSynSets(word));
        int[] out = new int[set.size()];
        int k = 0;
        for (Integer id : set)
            out[k++] = id;
        java.util.Arrays.sort(out);
        return out;
    }

    private static boolean intersect(int[] a, int[] b) {
        int i = 0, j = 0;
        while (i < a.length && j < b.length) {
            if (a[i] == b[j])
                return true;
            if (a[i] < b[j])
                i++;
            else
                j++;
        }
        return false;
    }

    public static void match(int module, Alignment a, Stage s, SynonymDictionary dict) {
        int n1 = a.words1.size(), n2 = a.words2.size();
        int[][] syn1 = new int[n1][];
        int[][] syn2 = new int[n2][];
        for (int i = 0; i < n1; i++)
            syn1[i] = synsets(dict, a.words1.get(i));
        for (int j = 0; j < n2; j++)
            syn2[j] = synsets(dict, a.words2.get(j));
        for (int j = 0; j < n2; j++) {
            int[] b = syn2[j];
            if (b.length == 0)
                continue;
            ArrayList<Match> at = s.matches.get(j);
            for (int i = 0; i < n1; i++) {
                int[] c = syn1[i];
                if (c.length == 0 || !intersect(c, b) || s.words1[i] == s.words2[j])
                    continue;
                Match m = new Match();
                m.module = module;
                m.prob = 1.0;
                m.start = j;
                m.length = 1;
                m.matchStart = i;
                m.matchLength = 1;
                at.add(m);
                s.line1Coverage[i]++;
                s.line2Coverage[j]++;
            }
        }
    }
}
