package edu.cmu.meteor.scorer;

import java.util.ArrayList;

/**
 * Drop-in replacement for meteor-1.5.jar's MeteorStats, put before the jar on the class path by
 * deepmedix.eval.nlg. Same fields, same sums, the same text from toString; the one change is that a
 * statistics line (EVAL) is read with String.split and Double.parseDouble instead of a java.util.Scanner per line,
 * whose float pattern compilation made an EVAL of a few thousand segments take most of a second.
 */
public class MeteorStats {

    public static final int STATS_LENGTH = 23;

    public double testLength;
    public double referenceLength;
    public double testFunctionWords;
    public double referenceFunctionWords;
    public double testTotalMatches;
    public double referenceTotalMatches;
    public ArrayList<Double> testStageMatchesContent;
    public ArrayList<Double> referenceStageMatchesContent;
    public ArrayList<Double> testStageMatchesFunction;
    public ArrayList<Double> referenceStageMatchesFunction;
    public double chunks;
    public double testWordMatches;
    public double referenceWordMatches;
    public double testWeightedMatches;
    public double referenceWeightedMatches;
    public double testWeightedLength;
    public double referenceWeightedLength;
    public double precision;
    public double recall;
    public double f1;
    public double fMean;
    public double fragPenalty;
    public double score;
    public edu.cmu.meteor.aligner.Alignment alignment;

    public MeteorStats() {
        testLength = 0;
        referenceLength = 0;
        testFunctionWords = 0;
        referenceFunctionWords = 0;
        testTotalMatches = 0;
        referenceTotalMatches = 0;
        testStageMatchesContent = new ArrayList<Double>();
        referenceStageMatchesContent = new ArrayList<Double>();
        testStageMatchesFunction = new ArrayList<Double>();
        referenceStageMatchesFunction = new ArrayList<Double>();
        chunks = 0;
        testWordMatches = 0;
        referenceWordMatches = 0;
        testWeightedMatches = 0;
        referenceWeightedMatches = 0;
        testWeightedLength = 0;
        referenceWeightedLength = 0;
        precision = 0;
        recall = 0;
        f1 = 0;
        fMean = 0;
        fragPenalty = 0;
        score = 0;
    }

    public void addStats(MeteorStats stats) {
        testLength += stats.testLength;
        referenceLength += stats.referenceLength;
        testFunctionWords += stats.testFunctionWords;
        referenceFunctionWords += stats.referenceFunctionWords;
        testTotalMatches += stats.testTotalMatches;
        referenceTotalMatches += stats.referenceTotalMatches;
        int pad = stats.referenceStageMatchesContent.size() - referenceStageMatchesContent.size();
        for (int k = 0; k < pad; k++) {
            testStageMatchesContent.add(0.0);
            referenceStageMatchesContent.add(0.0);
            testStageMatchesFunction.add(0.0);
            referenceStageMatchesFunction.add(0.0);
        }
        sum(testStageMatchesContent, stats.testStageMatchesContent);
        sum(referenceStageMatchesContent, stats.referenceStageMatchesContent);
        sum(testStageMatchesFunction, stats.testStageMatchesFunction);
        sum(referenceStageMatchesFunction, stats.referenceStageMatchesFunction);
        if (!(stats.testTotalMatches == stats.testLength && stats.referenceTotalMatches == stats.referenceLength
                && stats.chunks == 1.0))
            chunks += stats.chunks;
        testWordMatches += stats.testWordMatches;
        referenceWordMatches += stats.referenceWordMatches;
    }

    private static void sum(ArrayList<Double> into, ArrayList<Double> add) {
        for (int i = 0; i < add.size(); i++)
            into.set(i, into.get(i) + add.get(i));
    }

    public String toString(String delim) {
        StringBuilder sb = new StringBuilder();
        sb.append(testLength).append(delim);
        sb.append(referenceLength).append(delim);
        sb.append(testFunctionWords).append(delim);
        sb.append(referenceFunctionWords).append(delim);
        for (int i = 0; i < 4; i++) {
            if (i < testStageMatchesContent.size()) {
                sb.append(testStageMatchesContent.get(i)).append(delim);
                sb.append(referenceStageMatchesContent.get(i)).append(delim);
                sb.append(testStageMatchesFunction.get(i)).append(delim);
                sb.append(referenceStageMatchesFunction.get(i)).append(delim);
            } else {
                for (int k = 0; k < 4; k++)
                    sb.append(0.0).append(delim);
            }
        }
        sb.append(chunks).append(delim);
        sb.append(testWordMatches).append(delim);
        sb.append(referenceWordMatches).append(delim);
        return sb.toString().trim();
    }

    public String toString() {
        return toString(" ");
    }

    public MeteorStats(String ss) {
        this();
        String[] tok = ss.trim().split("\\s+");
        int t = 0;
        testLength = Double.parseDouble(tok[t++]);
        referenceLength = Double.parseDouble(tok[t++]);
        testFunctionWords = Double.parseDouble(tok[t++]);
        referenceFunctionWords = Double.parseDouble(tok[t++]);
        for (int i = 0; i < 4; i++) {
            double tc = Double.parseDouble(tok[t++]);
            double rc = Double.parseDouble(tok[t++]);
            testTotalMatches += tc;
            referenceTotalMatches += rc;
            testStageMatchesContent.add(tc);
            referenceStageMatchesContent.add(rc);
            double tf = Double.parseDouble(tok[t++]);
            double rf = Double.parseDouble(tok[t++]);
            testTotalMatches += tf;
            referenceTotalMatches += rf;
            testStageMatchesFunction.add(tf);
            referenceStageMatchesFunction.add(rf);
        }
        chunks = Double.parseDouble(tok[t++]);
        testWordMatches = Double.parseDouble(tok[t++]);
        referenceWordMatches = Double.parseDouble(tok[t++]);
    }
}
